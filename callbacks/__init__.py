"""Lightning callbacks: stage switching, frozen-parameter guard, checkpoints that keep the final step, sample grids,
periodic evaluation, throughput, more threads once a neighbouring job ends."""
