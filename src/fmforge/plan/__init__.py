"""Plan before you train: scaling laws, compute-optimal sizing, time and cost, fitted ladders, search."""
