"""irlm.lowering"""
