"""The wire contract every gRPC front, peer client and application client
shares: service names (methods), metadata, the value framing, message
codecs, and cache errors as gRPC statuses (status)."""
