"""A signal to the thread inside KVM_RUN interrupts it on both backends: Ctrl-C stops a
guest in an endless loop with KeyboardInterrupt, and the vCPU stays usable."""

from __future__ import annotations

import signal
import threading

import pytest

import kvmmmu
from kvmmmu import exits
from kvmmmu.guest import Guest


def test_sigint_interrupts_a_running_guest(kvm: kvmmmu.Kvm) -> None:
    g = Guest("lm64")
    a = g.asm
    a.label("spin")
    a.jmp("spin")
    a.label("stop")
    a.hlt()
    m = g.boot(kvm)
    main = threading.main_thread().ident
    assert main == threading.get_ident(), "signals are handled on the main thread"
    timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
    # Should the signal be missed, a kick ends the run (ExitIntr) and the test fails.
    watchdog = threading.Timer(10.0, m.vcpu.kick)
    timer.start()
    watchdog.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            m.vcpu.run()
    finally:
        timer.cancel()
        watchdog.cancel()
    regs = m.vcpu.get_regs()
    assert regs.rip == g.labels["spin"]
    regs.rip = g.labels["stop"]
    m.vcpu.set_regs(regs)
    assert isinstance(m.vcpu.run(), exits.ExitHlt)
    m.vm.close()
