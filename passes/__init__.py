"""irlm.passes"""
