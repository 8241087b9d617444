# Cython declarations (.pxd) and C headers of the datapath; nothing to import.
