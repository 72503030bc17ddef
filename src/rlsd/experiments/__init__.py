"""The embedded experiments: the synthetic task, the tiny model and its warm start, the demo, the benchmarks and
their reports. The library (`rlsd.*` outside this package) never imports them."""
