"""The sans-IO core of snatgw.

Everything here is pure Python: no sockets, subprocesses, logging or global
state, and every entry point that depends on time takes ``now`` (seconds,
monotonic) as an argument. Adapters in :mod:`gateway.adapters` feed packets
and the clock in and act on the verdicts and events that come out.
"""
