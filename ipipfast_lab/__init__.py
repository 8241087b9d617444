"""The lab: network-namespace testbeds with Calico's topology, traffic tools
run inside them, ipipfast daemons on their nodes, and the demo. Shared by the
demo, the tests and the benchmarks; nothing on a node imports it."""
