"""An example prunebench plug-in package."""
