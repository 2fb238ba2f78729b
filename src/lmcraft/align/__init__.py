"""lmcraft.align"""
