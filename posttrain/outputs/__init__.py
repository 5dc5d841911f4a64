"""The output contract every tool keeps: one-line errors, one writer per output directory, results that
appear whole or not at all, with the modes the umask gives; and the flag and path rules every command shares."""
