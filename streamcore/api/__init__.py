"""The public API's definitions: Job, Stream, Table, WorkerConfig and the query handle. It
only builds a job's graph; the runtime is imported when a job starts (Job.start/run)."""
