"""ksmlab's actors: one OS process per kernel thread, and the kernel paths they run."""
