"""raybig job scheduler: priority queue, gang admission, retries, on top of Ray Jobs."""
