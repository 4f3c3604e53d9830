"""`legrace bench`: step times, trusted-side MACs and memory of each mode, run round robin
(`runner`), with a per-layer breakdown through the split convs' timing hook (`timing`)."""
