"""netsvc.usbip: USB/IP (v1.1.1) with virtual devices, TLS and reconnecting client channels.

Layers (pure at the bottom, I/O at the top):

- ``protocol``: the wire codec (messages, encode, bounded decoders).
- ``descriptors``: USB descriptors, built and parsed.
- ``connection``: the server-end and client-end state machines (sans-IO).
- ``devices``: virtual devices (HID keyboard, CDC-ACM, bulk source/sink), sans-IO.
- ``tls``: TLS contexts and the PSK challenge-response.
- ``server``: the asyncio server; ``client``: ``list_devices``, ``Channel``,
  ``measure_throughput``, ``query_need``; ``cli``: ``netsvc usbip``.

The API the placement code uses: ``Channel(host, busid, port).open()`` ->
``need_bps()``, ``bulk_in/bulk_out/interrupt_in``, reconnection by itself, ``close()``;
``measure_throughput(channel, seconds)``; ``query_need(host, busid)``; and
``ServerThread(devices).start()`` or ``python -m netsvc.usbip serve`` for a server.
"""
