//! Port forwarding and stdio mode, built only on the public library API.
