"""Between the API and the runtime: the graph's nodes (graph), the job frozen as declared
(logical: what Job.build() returns), the plan laid out for an application id in
sub-topologies with their internal topics and stores (physical: what the runtime runs and
explain() prints), and the partition counts of internal topics (topics)."""
