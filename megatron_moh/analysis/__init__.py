"""After-the-run analysis: which heads the routers pick on which data (`heads`), and how runs
compare in megatron's own TensorBoard scalars (`runs`); `plots` draws both, `sources` reads the
named token sources. The command lines are `megatron_moh.commands.analyze_heads` and
`megatron_moh.commands.compare_runs`."""
