"""The weights folder: which files each preset needs and whether they verify (`store`), and getting
them (`download`). Nothing else in the project downloads; `fer weights` is the command."""
