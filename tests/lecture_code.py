"""The lecture's code (shared/seeds), kept verbatim apart from indentation, the plot and
returning the losses it computes: the reference that torchhet must reproduce exactly."""

import torch


def run_lecture(epochs=500):
    torch.random.manual_seed(10)
    # Set up x points
    x = torch.linspace(-3, 3, 500)
    # Add a batch dimension
    x = x.reshape(x.size(0), 1).float()
    # y values without noise
    y_original = torch.sin(x)
    # x-dependent noise, higher magnitude near the center
    noise_std = 0.1 * (3 - torch.abs(x))
    noise = torch.randn_like(x) * noise_std
    # Training data
    y_noisy = y_original + noise

    class NormalModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(1, 512),
                torch.nn.ReLU(),
                torch.nn.Linear(512, 512),
                torch.nn.ReLU()
            )
            self.mean_head = torch.nn.Linear(512, 1)
            self.var_head = torch.nn.Linear(512, 1)

        def forward(self, x):
            features = self.layers(x)
            mu = self.mean_head(features)
            sigma_sq = torch.nn.functional.softplus(self.var_head(features)) + 1e-6
            return mu, sigma_sq

    def gaussian_nll_loss(mu, sigma_sq, target):
        return (torch.log(sigma_sq) / 2 + (target - mu)**2 / (2 * sigma_sq)).mean()

    net = NormalModel()
    initial = {n: t.detach().clone() for n, t in net.state_dict().items()}
    learning_rate = 0.001
    losses = []
    for epoch in range(epochs):
        # Ensure that there are no gradients stored
        net.zero_grad()
        # This is the forward pass
        mu, variance = net(x)
        # This computes the loss
        loss = gaussian_nll_loss(mu, variance, y_noisy)
        losses.append(loss.item())
        # This computes the gradients (derivates of the error w.r.t each parameter)
        loss.backward()
        # Update the parameters
        for param in net.parameters():
            param.data -= param.grad * learning_rate
            # Zero the gradient before the next pass
            param.grad = None
    return {"x": x, "y": y_noisy, "initial": initial, "losses": losses,
            "final": {n: t.detach().clone() for n, t in net.state_dict().items()},
            "NormalModel": NormalModel}
