"""API: the gRPC services (Admin, Sandbox), the join socket, metrics; translates to and from the core."""
