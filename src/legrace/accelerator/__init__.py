"""The untrusted accelerator: `compute` answers the boundary's requests (the heavy convolutions of
the released residuals), `worker` serves it over a socket as `legrace worker`. It holds no data set,
no labels and no low-rank part, and imports nothing of the trusted side."""
