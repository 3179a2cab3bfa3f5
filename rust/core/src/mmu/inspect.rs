//! Read-only views of the shadow MMU for tools and the Python API.
