"""The runtime: worker, partition tasks, operators, commits, state. Internal; users import
streamcore."""
