"""The local run queue: the queue API, the worker that starts runs, the runner that
supervises one, GPU placement and the command lines that launch training."""
