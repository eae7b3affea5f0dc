"""The lab: network namespaces, the whoami echo service and the `snatgw lab` command.

Everything a test, the demo or the benchmark needs to run the gateway against a private,
disposable "internet" lives here; nothing in it touches the host's own interfaces.

* :mod:`~gateway.lab.layout`: addresses, namespace names, state paths (pure);
* :mod:`~gateway.lab.topology`: build and remove a lab, its lock, the kernel-NAT baseline;
* :mod:`~gateway.lab.netns`: run commands in a namespace; the error types;
* :mod:`~gateway.lab.procs`: wait on conditions, start and stop processes by pid;
* :mod:`~gateway.lab.clients`: curl, ping, iperf3, nc, the probe, the whoami log;
* :mod:`~gateway.lab.capture`: tcpdump in a namespace;
* :mod:`~gateway.lab.gatewayproc`: a ``snatgw run`` process and its log and CLI;
* :mod:`~gateway.lab.probe` and :mod:`~gateway.lab.whoami`: programs run inside the lab.
"""
