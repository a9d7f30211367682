"""The engine: worker, partition tasks, offset tracking. Internal; users import streamcore."""
