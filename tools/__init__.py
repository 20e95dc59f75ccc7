"""chla_tools: offline helpers that are also stage kinds (demo assets, vocabulary extension, ...)."""
