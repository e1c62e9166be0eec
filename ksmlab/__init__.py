"""ksmlab: an executable, multiprocess model of Linux KSM (mm/ksm.c)."""
