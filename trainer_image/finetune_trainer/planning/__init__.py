"""Planning before GPUs are taken: the model's shape from its config alone, a per-GPU memory
estimate, time and cost, and advice on what fits (`finetune plan`, `status.estimate`).

Torch-free at import; only the exact parameter count builds the model on the meta device.
"""
