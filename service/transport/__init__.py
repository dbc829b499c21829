"""The HTTP transport and its hardening: connections, bodies, access, bounded parsing of untrusted bytes."""
