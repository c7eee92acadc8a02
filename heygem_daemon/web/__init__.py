"""The web console (`heygem-daemon web`): a separate process that reads the store, hands finished tus
uploads to the inbox as ready job folders, and asks the daemon to cancel or retry — nothing else."""
