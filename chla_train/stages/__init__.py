"""One module per stage kind: what runs inside the job."""
