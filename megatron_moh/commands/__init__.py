"""Command-line programs: each module has build_parser() and main(argv), used by tools/ and the console scripts."""
