"""The engine process: runs tasks in its main thread, heartbeats and control from a side thread."""
