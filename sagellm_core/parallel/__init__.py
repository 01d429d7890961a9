"""Running one model over several devices through torch.distributed (NCCL on CUDA, the backend's own
collective library on other accelerators, gloo on the CPU)."""
