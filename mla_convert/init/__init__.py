"""How new attention weights are seeded from trained ones: :mod:`.seeders` (one seeder per spec
type, in a table) and the pure tensor math it uses (SVD, whitening, head grouping, budgets,
attention transfer)."""
