"""chla_tools: the library behind the stage runners (chla_train/stages) and the `chla` commands:
demo assets, vocabulary extension, pre-tokenization, merging, evaluation, export, reports."""
