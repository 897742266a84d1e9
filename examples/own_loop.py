"""BackMix in your own training loop: a torchvision ResNet-18 on an open-set split.

    python examples/own_loop.py --data data/digits --epochs 10
    torchrun --nproc_per_node 2 examples/own_loop.py --data data/digits     # one shard per rank
backmix.rebuilding: the CAMs of each batch as it trains (no second pass over the data) are the next maps.
"""
import argparse
import os

import torch
import torchvision

import backmix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared folder with train/ and test/")
    p.add_argument("--split", default="0", help="open-set split number, or comma list of known classes")
    p.add_argument("--cache", default="runs/own_loop/cache", help="foreground-cache folder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rebuild-every", type=int, default=2, help="new foreground maps every k epochs")
    args = p.parse_args()

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    data = backmix.open_set_data(args.data, split=args.split)
    train = backmix.loader(data, cache=args.cache, batch_size=64, canvas=40, crop=32)   # this rank's shard
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=data.num_known).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=args.epochs * len(train))
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        rebuild = (epoch + 1) % args.rebuild_every == 0 and epoch + 1 < args.epochs   # none after the last
        with backmix.rebuilding(train, model, enabled=rebuild) as cams:
            for batch in train:
                cams.record(batch)                    # its CAMs, with the weights of the step that trains on it
                x, y = batch.inputs()                 # clean + mixed crops, closed-set labels
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
                sched.step()
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, masks from generation {train.maps.generation}")
    if rank == 0:
        m = backmix.evaluate(model, backmix.loader(data, train=False), data)
        print(f"accuracy {m['accuracy']:.3f}  AUROC {m['auroc_msp']:.3f} (MSP) {m['auroc_mls']:.3f} (MLS)")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
