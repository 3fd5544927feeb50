"""How knowledge transfers: strategies (freeze plans), the transfer policy, the L-BFGS head fit, heads, optimizers, schedulers, budgets, domain adaptation."""
