/* Headers dm_replica.ko needs from `kernel::bindings`; appended to the
 * kernel's rust/bindings/bindings_helper.h before it is built. */
#include <linux/bio.h>
#include <linux/device-mapper.h>
#include <linux/highmem.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
