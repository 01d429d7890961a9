"""Eviction policies beyond LRU (LFU, ARC, S3-FIFO) and a trace-driven comparison of hit rates."""
