"""Vendor code: what KVM's vmx/tdx.c and svm/sev.c add to the generic MMU, and the hardware
or firmware they drive.

* ``base``: the interface the MMU and the VM call (``kvm_x86_ops``/``kvm_arch_gmem_*``-shaped)
  and the plain VM's behaviour;
* ``tdx`` (KVM's TDX side) over ``tdx_module`` (a model of the TDX module);
* ``sev`` (KVM's SNP side) over ``rmp`` (the Reverse Map Table);
* ``sw_mirror``: the software external tree of ``sw_protected`` with ``mirror=True``.

This package imports none of its modules itself, so a lower layer (``memslot`` uses
``rmp``) can import one without pulling in the rest.
"""
