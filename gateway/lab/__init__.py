"""The lab: network namespaces, the whoami echo service and the `snatgw lab` command.

Everything a test, the demo or the benchmark needs to run the gateway against a private,
disposable "internet" lives here; nothing in it touches the host's own interfaces.
"""
