"""The trusted side (what runs inside the TEE): the engine, the model conversion, the split conv's
forward and backward, the per-sample decomposition, the noise mechanism and its sampler, and the
kernels that keep the trusted side fast and small. Nothing here imports `legrace.accelerator`:
the accelerator is reached only through `legrace.boundary`."""
