"""Lightning callbacks: stage switching, frozen-parameter guard, sample grids, periodic evaluation."""
