"""The precision runtime: budget -> pool layout, packed tiers in host memory, experts
executed from the pool through leases, the controller between steps, and the policies."""
