"""What a job's graph means before it runs: the nodes, the internal topics it needs, which
chain reads which topic, and explain()."""
