"""``dalle batch`` as a library: read a prompt file, plan (row, image) jobs with seeds and shards, keep a manifest,
run the jobs through one :class:`~dallecli.engine.generate.Engine`. Nothing here prints or exits."""
