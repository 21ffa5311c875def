"""Host-path token exchanges (the byte-moving half of the host dispatchers), written over the
transport's endpoints: :mod:`.onesided` (layout, wire format, run loop), :mod:`.nixl`, :mod:`.mooncake`.
The dispatchers themselves are in :mod:`sglang_elastic.dispatch.host_onesided` and
:mod:`sglang_elastic.dispatch.torch_a2a`."""
