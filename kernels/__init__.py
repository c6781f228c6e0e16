"""irlm.kernels"""
