"""Process hygiene: glibc allocator thresholds and threads that leave no OpenMP team behind."""
